// The one polling loop of the console: a setTimeout chain, so a slow answer never
// overlaps the next request. It always reschedules itself, doubles its delay after an
// error (up to maxMs) and returns to the normal pace on the next success, and does not
// run while the tab is hidden: it picks up at once when the tab is shown again.
//
//   const loop = poll(async () => render(await api.stats()), { everyMs: 2000, onError });
//   loop.now();   // refresh right away, e.g. after a user action
//   loop.stop();  // when the page goes away
//
// everyMs may be a function, asked before each wait: pages poll slowly while the event
// stream is live (it tells them when to refresh) and at their normal pace when it is not.

export function poll(tick, { everyMs = 2000, maxMs = 30000, onError = () => {}, onOk = () => {} } = {}) {
  const pace = () => (typeof everyMs === "function" ? everyMs() : everyMs);
  let delay = pace();
  let timer = null;
  let running = false; // a tick is in progress
  let again = false; // now() was called during a tick
  let stopped = false;

  function schedule(ms) {
    clearTimeout(timer);
    timer = null;
    if (stopped || document.hidden) return; // visibilitychange restarts a hidden loop
    timer = setTimeout(run, ms);
  }

  async function run() {
    timer = null;
    if (stopped || document.hidden) return;
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      await tick();
      if (stopped) return;
      delay = pace();
      onOk();
    } catch (err) {
      if (stopped) return;
      delay = Math.min(delay * 2, maxMs);
      onError(err);
    } finally {
      running = false;
    }
    if (again) {
      again = false;
      schedule(0);
    } else {
      schedule(delay);
    }
  }

  function onVisibility() {
    if (!document.hidden && !running && timer === null) schedule(0);
  }

  document.addEventListener("visibilitychange", onVisibility);
  schedule(0);

  return {
    now() {
      if (running) again = true;
      else schedule(0);
    },
    stop() {
      stopped = true;
      clearTimeout(timer);
      document.removeEventListener("visibilitychange", onVisibility);
    },
  };
}
