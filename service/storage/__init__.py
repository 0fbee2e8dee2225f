"""The files themselves: the claim's rename and vetting, archives and their worker
process, durable file operations, names as bytes."""
