"""OpenAI Responses WebSocket gateway."""
