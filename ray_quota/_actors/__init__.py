"""The Ray actors: thin asyncio shells around the core's sans-IO classes."""
