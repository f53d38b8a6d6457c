"""Tool calling: OpenAI's `tools` and `tool_choice` on any llama.cpp model.

What a request carries (`schema.py`: tools, tool choice, calls), how a model family is
asked for calls and held to them (`formats.py`: the family from the chat template, the
prompt's tool text and messages, the grammar and its lazy triggers), and how its output
becomes calls, piece by piece while it streams (`parse.py`). Nothing here needs llama.cpp:
the worker hands in llama-cpp-python's JSON-schema converter, so the gateway, the Responses
API and tests can use the same pieces.

    plan = formats.plan(tools, choice, parallel=True, template=chat_template, to_gbnf=...)
    plan.messages(messages)  -> messages for the chat template (the tools' text for a model
                                with no format of its own)
    plan.grammar, plan.lazy_patterns -> what the sampler holds the output to
    parser = parse.CallParser(plan.family, new_id)  -> parser.feed(text) / parser.close()
"""
