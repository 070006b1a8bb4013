"""A model's chat template is rendered when the stick is built, in the sandbox the chat uses.

The template is Jinja from the model file. llama-cpp-python renders it in a sandbox, so a hostile
one cannot run code, but at chat time it would only fail; here the build refuses the model with
its name and the reason before a stick carrying it is written. The runtime renders it again
before the first chat (kit.engine), since a stick's files may have been changed since.
"""

from __future__ import annotations

from kit.errors import BuildError, EngineError
from kit.ggufmeta import ModelFacts

# The template's own special tokens are not among the facts read at build time; any text serves:
# what is checked is that the sandbox lets the template render, not the prompt it makes.
SAMPLE_BOS, SAMPLE_EOS = "<bos>", "<eos>"


def refuse_unsafe_template(model_id: str, facts: ModelFacts) -> None:
    if not facts.chat_template:
        return
    from kit.engine import check_chat_template

    try:
        check_chat_template(facts.chat_template, bos=SAMPLE_BOS, eos=SAMPLE_EOS, model_id=model_id)
    except EngineError as err:
        raise BuildError(str(err), f"take model {model_id!r} out of the profile, or use a GGUF file of it "
                                   "from another source") from None
