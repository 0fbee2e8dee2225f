"""The operator's face: the `filedock` command, the HTTP endpoints, status reports,
metrics and log lines."""
