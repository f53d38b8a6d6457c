"""OpenAI's wire format, shared by the gateway and batch files: request bodies into farm's
Requests (api, choices, embeddings, responses), and farm's results and errors into
OpenAI's response, stream-chunk and error shapes; shapes documents them for /openapi.json."""
