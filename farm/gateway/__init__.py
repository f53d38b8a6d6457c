"""The OpenAI-compatible HTTP gateway: `farm serve`.

app.py      FastAPI endpoints (/v1/models, /v1/chat/completions, /v1/completions)
openai.py   OpenAI's request, response, stream and error shapes <-> farm's
keys.py     API keys: made and hashed here, stored by farm/registry/keys.py
models.py   GET /v1/models/{id}
openapi.py  what /openapi.json says of each route's body and errors
"""
