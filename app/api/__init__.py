"""HTTP front end: thin routes, request/response schemas, error mapping. Knows nothing of torch."""
