-- wrk script for the L0 ceiling: POST a small JSON body like a task submission.
wrk.method = "POST"
wrk.body = '{"capability":"debug.echo","payload":{"n":1}}'
wrk.headers["Content-Type"] = "application/json"
