"""agentproxy: an OpenAI-compatible reverse proxy for agent and model servers."""

__version__ = "0.1.0"
