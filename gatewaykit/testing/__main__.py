"""``python -m gatewaykit.testing``: serve the fake LLM provider under uvicorn."""

from gatewaykit.testing.fake_provider import main

main()
