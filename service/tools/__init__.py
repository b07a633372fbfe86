"""Tool calling, shared by the OpenAI HTTP API and gRPC.

``specs`` validates the tools and tool_choice of a request, renders tool
messages for the chat template and builds the JSON schema that forces a call
(tool_choice required or a named function); ``parsers`` turns model output
into tool calls, whole or streamed, in the format the server's
``--tool-call-parser`` names.
"""
