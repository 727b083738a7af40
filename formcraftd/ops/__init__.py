"""Operating the daemon: the HTTP server, metrics, monitoring and alerts, logs,
error tracking, live reload and systemd notifications."""
