"""fal's HTTP protocol for fal-ai/sam2/auto-segment (queue, synchronous run, status streams, webhooks) and
fal-ai/sam2/image (synchronous run), so that @fal-ai/client and fal-client work against this server by changing
their base URL. See routes.py."""
