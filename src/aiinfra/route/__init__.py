"""The fleet gateway: one OpenAI-compatible endpoint over many servers (ours, vLLM, any OpenAI-compatible one).

Speaks HTTP to its backends and imports no other pillar; policies are pure functions over backend state.
"""
