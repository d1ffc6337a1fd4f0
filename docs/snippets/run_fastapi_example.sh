# From the repository root, with uvicorn installed (pip install uvicorn):
CONVEX_URL=https://happy-otter-123.convex.cloud \
SERVICE_EMAIL=bot@example.com SERVICE_PASSWORD=... \
    uvicorn --factory --app-dir docs/examples fastapi_app:create_app
