"""Prompts: the released templates (byte-exact), chat rendering per model family, and the parser
that reads a judgement back out of model output."""

from urt.prompts.parse import (
    Judgement,
    parse_dimensions,
    parse_implicit,
    parse_output,
    parse_totals,
    winner_of,
)
from urt.prompts.render import (
    ALL_ANSWER_STRINGS,
    ANSWER_STRINGS,
    FAMILIES,
    FIELDS,
    TASKS,
    TEMPLATE_SETS,
    TIE_STRINGS,
    ChatPrompt,
    answer_string,
    assistant_suffix,
    available_templates,
    default_template_set,
    load_template,
    render_chat,
    render_text,
    template_fields,
)

__all__ = [
    "ALL_ANSWER_STRINGS",
    "ANSWER_STRINGS",
    "FAMILIES",
    "FIELDS",
    "TASKS",
    "TEMPLATE_SETS",
    "TIE_STRINGS",
    "ChatPrompt",
    "Judgement",
    "answer_string",
    "assistant_suffix",
    "available_templates",
    "default_template_set",
    "load_template",
    "parse_dimensions",
    "parse_implicit",
    "parse_output",
    "parse_totals",
    "render_chat",
    "render_text",
    "template_fields",
    "winner_of",
]
