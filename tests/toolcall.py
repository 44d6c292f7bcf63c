"""A chat template with tool calls and reasoning for the small model, and the
requests that make llama-server produce a real tool call and real reasoning
(used by the ``tools_server`` fixture in conftest.py)."""

TOOLS_TEMPLATE = r"""{%- if tools %}<|im_start|>system
You can call these functions: <tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>
Call one by replying with <tool_call>{"name": <name>, "arguments": <object>}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|im_start|>user
<tool_response>{{ message.content }}</tool_response><|im_end|>
{% elif message.role == "assistant" %}<|im_start|>assistant
{% if message.reasoning_content %}<think>{{ message.reasoning_content }}</think>{% endif %}
{%- if message.content %}{{ message.content }}{% endif %}
{%- if message.tool_calls %}{% for tc in message.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {% if tc.function.arguments is string %}{{ tc.function.arguments }}{% else %}{{ tc.function.arguments | tojson }}{% endif %}}
</tool_call>{% endfor %}{% endif %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}
"""

WEATHER_TOOL = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# The small model does not decide to call tools; it copies text well when
# asked to. The grammar llama-server builds for tool_choice "required" turns
# the copied call into a real, parsed tool call (after the content
# "Checking.\n"); the stop string ends it after one call.
_COPY = "Copy this text exactly, including the tags:\n"
TOOL_REQUEST = dict(
    messages=[{"role": "user", "content": _COPY + 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}],
    tools=WEATHER_TOOL, tool_choice="required", stop=["</tool_call>"], max_tokens=60, seed=1, temperature=0,
)
# One example turn shows the model that the tags are copied too; its reply
# "<think>I am thinking</think>Hello there" comes back split by
# --reasoning-format deepseek into reasoning_content and content.
REASONING_REQUEST = dict(
    messages=[
        {"role": "user", "content": _COPY + "<think>A cat</think>Good morning"},
        {"role": "assistant", "content": "<think>A cat</think>Good morning"},
        {"role": "user", "content": _COPY + "<think>I am thinking</think>Hello there"},
    ],
    stop=["<|im_end|>"], max_tokens=20, seed=1, temperature=0,
)
