# OffloadMQ: `make run` starts the server, `make test` runs every test.
# Both set up .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run dev-mq test test-unit browser postgres clean bench bench-tools torture

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) offloadmq.py

dev-mq: run

# The console tests drive Debian's Chromium; install it when it is missing.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi; }

# The PostgreSQL store's tests start a throwaway cluster of Debian's postgresql (its
# programs live in /usr/lib/postgresql/<version>/bin); install it when it is missing.
postgres:
	@command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq postgresql >/dev/null; fi; }

# Two workers: most of the suite waits on real processes, not on the CPU.
test: $(STAMP) browser postgres
	$(PY) -m pytest -q -n 2

test-unit: $(STAMP)
	$(PY) -m pytest -q -m unit

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) setup.cfg
	$(PY) -m pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

# The peers need Debian's redis-server and the L0 ceiling needs Debian's wrk.
bench-tools:
	@command -v redis-server >/dev/null 2>&1 && command -v wrk >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server wrk >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server wrk >/dev/null; fi; }

# `make bench BENCH_ARGS=--quick` for a smoke run; bench/run.py --help lists the options.
bench: $(BENCH_STAMP) bench-tools postgres
	$(PY) bench/run.py $(BENCH_ARGS)

# ---- a local server + agent pair for trying things by hand (state in test-run/, git-ignored)
TEST_RUN := test-run
TEST_PORT ?= 3169
TEST_URL := http://127.0.0.1:$(TEST_PORT)
AGENT_CAPS ?= debug.echo shell.bash shellcmd.bash
SERVER_URL ?= http://127.0.0.1:3069

.PHONY: test-full test-start test-stop test-logs dev-agent

# Fresh random keys for the test pair, readable only by you; no secret lives in this file.
$(TEST_RUN)/env: | $(STAMP)
	@mkdir -p $(TEST_RUN)
	@umask 077; $(PY) -c "import secrets; [print(f'{n}={p}-{secrets.token_hex(12)}') for n, p in (('AGENT_API_KEYS', 'ak'), ('CLIENT_API_KEYS', 'ck'), ('MGMT_TOKEN', 'mt'))]" > $@

test-start: $(STAMP) $(TEST_RUN)/env
	@test ! -f $(TEST_RUN)/server.pid || { echo "already running: make test-stop first"; exit 1; }
	@set -a; . ./$(TEST_RUN)/env; set +a; \
	$(PY) offloadmq.py --host 127.0.0.1 --port $(TEST_PORT) --data $(TEST_RUN)/data \
	  >> $(TEST_RUN)/server.log 2>&1 & echo $$! > $(TEST_RUN)/server.pid; \
	for i in $$(seq 100); do $(PY) -c "import urllib.request as u; u.urlopen('$(TEST_URL)/health', timeout=1)" 2>/dev/null && break; sleep 0.1; done; \
	$(PY) offload_agent.py register --server $(TEST_URL) --key "$$AGENT_API_KEYS" \
	  --caps $(AGENT_CAPS) --capacity 2 --config $(TEST_RUN)/agent.json; \
	$(PY) offload_agent.py serve --config $(TEST_RUN)/agent.json --work-dir $(TEST_RUN)/work \
	  >> $(TEST_RUN)/agent.log 2>&1 & echo $$! > $(TEST_RUN)/agent.pid
	@echo "server $(TEST_URL) and an agent are running; keys in $(TEST_RUN)/env; make test-logs / test-stop"

# The agent goes first: on SIGTERM it finishes running tasks (30 s grace) and reports them.
test-stop:
	@for name in agent server; do \
	  pidfile=$(TEST_RUN)/$$name.pid; \
	  if [ -f $$pidfile ]; then \
	    pid=$$(cat $$pidfile); kill $$pid 2>/dev/null; \
	    for i in $$(seq 400); do kill -0 $$pid 2>/dev/null || break; sleep 0.1; done; \
	    rm -f $$pidfile; echo "stopped $$name ($$pid)"; \
	  fi; \
	done

test-logs:
	@tail -n 40 $(TEST_RUN)/server.log $(TEST_RUN)/agent.log

# Start the pair, send it a blocking shell.bash task, run the end-to-end suites, stop both.
test-full: $(STAMP)
	@$(MAKE) --no-print-directory test-start
	@set -a; . ./$(TEST_RUN)/env; set +a; \
	curl -fsS -H "X-API-Key: $$CLIENT_API_KEYS" -H 'Content-Type: application/json' \
	  -d '{"capability": "shell.bash", "urgent": true, "payload": {"command": "echo hello from $$(hostname)"}}' \
	  $(TEST_URL)/api/task/submit_blocking > $(TEST_RUN)/smoke.json \
	&& $(PY) -c "import json, sys; t = json.load(open('$(TEST_RUN)/smoke.json')); print('smoke:', t['status'], t['result']); sys.exit(t['status'] != 'completed')" \
	&& $(PY) -m pytest -q tests/test_e2e*.py; \
	status=$$?; $(MAKE) --no-print-directory test-stop; exit $$status

# Serve this machine to a `make run` server: registers once (OFFLOAD_AGENT_KEY = an agent
# key it printed), then serves until Ctrl-C.
dev-agent: $(STAMP)
	@test -f .offload-agent.json || { \
	  test -n "$$OFFLOAD_AGENT_KEY" || { echo "set OFFLOAD_AGENT_KEY to an agent key of the server"; exit 1; }; \
	  $(PY) offload_agent.py register --server $(SERVER_URL) --caps $(AGENT_CAPS); }
	$(PY) offload_agent.py serve

# The whole queue under repeated kill -9: acknowledged, lost, duplicated, stuck.
# `make torture TORTURE_ARGS="--tasks 2000 --kills 20"` for a longer run.
torture: $(STAMP)
	$(PY) bench/torture.py $(TORTURE_ARGS)
