"""An Ollama Modelfile for the exported GGUF: FROM the file, the model's own chat template as an Ollama (Go)
template, SYSTEM, and the sampling/context PARAMETERs (Ollama's documented Modelfile format:
`INSTRUCTION arguments`, multi-line arguments in triple quotes).

The TEMPLATE is derived from the tokenizer's chat template by rendering it with sentinel strings for the system
prompt and the user message and putting Ollama's `{{ .System }}` / `{{ .Prompt }}` where they landed, so the
served model sees exactly the prompt format it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SYSTEM_SENTINEL = "\x00KUBETUNE-SYSTEM\x00"
PROMPT_SENTINEL = "\x00KUBETUNE-PROMPT\x00"
TRIPLE = '"""'


class TemplateError(ValueError):
    """The chat template cannot be expressed as an Ollama template."""


def _common_suffix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def ollama_template(tokenizer) -> str:
    """The tokenizer's chat template as an Ollama Go template (system turn optional, one user turn, the
    assistant's generation prompt). TemplateError when the template does not render them separably."""
    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    user = {"role": "user", "content": PROMPT_SENTINEL}
    without = render([user])
    try:
        with_system = render([{"role": "system", "content": SYSTEM_SENTINEL}, user])
    except Exception:  # noqa: BLE001 - some templates refuse system turns
        with_system = None
    if without.count(PROMPT_SENTINEL) != 1:
        raise TemplateError("the chat template does not render the user message exactly once")
    bos = getattr(tokenizer, "bos_token", None) or ""
    if bos and without.startswith(bos):  # llama.cpp adds BOS itself (tokenizer.ggml.add_bos_token)
        without = without[len(bos):]
        with_system = with_system[len(bos):] if with_system and with_system.startswith(bos) else with_system
    prompt_part = without.replace(PROMPT_SENTINEL, "{{ .Prompt }}")
    if not with_system or with_system.count(SYSTEM_SENTINEL) != 1:
        return prompt_part
    # with_system = P + X + S and without = P + S, with S their longest common suffix: X is the system turn.
    n = _common_suffix(with_system, without)
    head, suffix = without[:len(without) - n], without[len(without) - n:]
    system_turn = with_system[len(head):len(with_system) - n]
    if not with_system.startswith(head) or SYSTEM_SENTINEL not in system_turn:
        return prompt_part
    return (head.replace(PROMPT_SENTINEL, "{{ .Prompt }}") + "{{ if .System }}"
            + system_turn.replace(SYSTEM_SENTINEL, "{{ .System }}") + "{{ end }}"
            + suffix.replace(PROMPT_SENTINEL, "{{ .Prompt }}"))


@dataclass
class ModelfileSpec:
    """What goes into the Modelfile."""

    gguf_file: str
    template: str = ""
    system: str = ""
    temperature: float = 0.7
    top_p: float = 0.9
    num_ctx: int = 2048
    stop: list[str] = field(default_factory=list)


def _quoted(text: str) -> str:
    if TRIPLE in text:
        raise TemplateError('a Modelfile argument cannot contain """')
    return f"{TRIPLE}{text}{TRIPLE}"


def render_modelfile(spec: ModelfileSpec) -> str:
    """The Modelfile text."""
    lines = ["# Modelfile for the fine-tuned model (ollama create NAME -f Modelfile)", f"FROM ./{spec.gguf_file}"]
    if spec.template:
        lines.append(f"TEMPLATE {_quoted(spec.template)}")
    if spec.system:
        lines.append(f"SYSTEM {_quoted(spec.system)}")
    lines += [f"PARAMETER temperature {spec.temperature:g}", f"PARAMETER top_p {spec.top_p:g}",
              f"PARAMETER num_ctx {int(spec.num_ctx)}"]
    for stop in spec.stop:
        if '"' in stop or "\n" in stop:
            continue
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n"
