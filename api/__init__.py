"""FastAPI control plane: one router per resource; talks to Temporal only through the client."""
