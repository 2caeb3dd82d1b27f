"""The command-line client: `gpt-service status | history | logs | cancel | resume | load | unload |
models | generate`, and `train` / `evaluate` when a service is named, talking to a running service.

The service is `--url` (else `GPT_SERVICE_URL`, else http://127.0.0.1:8000) and the key `--api-key`
(else `GPT_SERVICE_API_KEY`). `train` and `evaluate` run in this process unless `--url` is given or
`GPT_SERVICE_URL` is set. Exit codes, for scripts (`gpt_service.client.errors`):

    0    success (a followed task completed)
    1    the service answered with an error (4xx or 5xx), or a followed task failed
    2    usage error: a bad flag or value, caught before anything is sent
    3    the service cannot be reached (refused, timed out, connection lost)
    4    a followed task was cancelled
    5    the service refused the API key (401)
    130  interrupted (Ctrl-C); a followed task goes on running on the service

Modules: `http` (the HTTP client), `commands` (one function per subcommand), `follow` (the live
progress bar), `render` (tables), `parsers` (the subcommands' flags), `modes` (local or remote
`train` and `evaluate`). None imports torch or the server.
"""
