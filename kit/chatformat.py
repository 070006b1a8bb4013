"""The manifest's fallback chat formats, for a GGUF that carries no chat template (the demo model).

The engine renders them with llama-cpp-python's own formatters (kit.engine); llama-server, which
has no such names, gets the same prompt as a Jinja template (`server_template`): the two must
give the same text for the same messages (tests/test_serve.py compares them through llama-server's
own /apply-template). The stop strings are the same for both front ends.

Part of the pure core: no llama_cpp, no textual.
"""

from __future__ import annotations

# Fallback chat formats that do not tell llama.cpp where a turn ends: without these a base
# model writes the next "### Instruction" itself and talks to itself until max_tokens.
TURN_MARKERS = {"alpaca": ["###", "</s>"], "vicuna": ["USER:", "</s>"], "zephyr": ["<|user|>", "</s>"]}
# A base model under a foreign template ends its answer with its own family's markers, which
# llama.cpp does not treat as end-of-generation (Gemma 3 270M loops on <start_of_image>).
FAMILY_MARKERS = ["<start_of_image>", "<end_of_turn>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>"]
ALPACA_CUE = "### Response:\n"  # the Alpaca template's own last line, which llama-cpp-python leaves out

# The first system message, as llama-cpp-python's _get_system_message finds it.
_SYSTEM = ("{%- set ns = namespace(system='', n=0) -%}"
           "{%- for m in messages -%}{%- if m['role'] == 'system' and ns.system == '' -%}"
           "{%- set ns.system = m['content'] -%}{%- endif -%}{%- endfor -%}")

# Jinja twins of llama-cpp-python 0.3.36's formatters (llama_chat_format.format_alpaca + the
# kit's cue, format_chatml, format_llama3), for llama-server's template engine.
SERVER_TEMPLATES = {
    "alpaca": _SYSTEM + "{{- ns.system + '\\n\\n' -}}"
    "{%- for m in messages -%}{%- if m['role'] in ['user', 'assistant'] and m['content'] -%}"
    "{{- ('### Instruction' if m['role'] == 'user' else '### Response') + ': ' + m['content']"
    " + ('\n\n' if ns.n % 2 == 0 else '</s>') -}}"
    "{%- set ns.n = ns.n + 1 -%}{%- endif -%}{%- endfor -%}"
    "{{- '" + ALPACA_CUE.replace("\n", "\\n") + "' -}}",
    "chatml": _SYSTEM + "{{- '<|im_start|>system\\n' + ns.system + '<|im_end|>\\n' -}}"
    "{%- for m in messages -%}{%- if m['role'] in ['user', 'assistant'] and m['content'] -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}{{- '<|im_start|>assistant\\n' -}}",
    "llama-3": "{%- for m in messages -%}{%- if m['role'] in ['system', 'user', 'assistant'] and m['content'] -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' -}}"
    "{%- endif -%}{%- endfor -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}",
}


def stop_strings(chat_format: str | None) -> list[str]:
    """What ends an answer under a fallback format (nothing extra for a GGUF's own template)."""
    if not chat_format:
        return []
    return TURN_MARKERS.get(chat_format, []) + FAMILY_MARKERS


def server_template(chat_format: str) -> str | None:
    """llama-server's Jinja template for a fallback format, or None when the kit has none."""
    return SERVER_TEMPLATES.get(chat_format)
