"""The `shuttle` CLI: planning, enqueueing by task name, progress, reports. Never imports `worker`."""
