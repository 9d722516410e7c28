"""What the model replica sends back per request, built from engine deltas: text, log-probabilities, tool calls.

`Answer` is fed every `RequestDelta` of one request and, whenever the replica sends an item, hands over what
accumulated since the last one (`take`), as plain lists and dicts that cross a Serve handle:
  - `text`: content (with tools, what the tool parser releases; the rest comes at the end);
  - `logprobs`: positions `[token, logprob, [[token, logprob], ...top-k by rank]]` (raw model distribution);
  - `prompt_logprobs` (first item, completions with echo + logprobs): the same per prompt token, the first
    `[token, None, None]`; `prompt_text` (first item, echo): the prompt as text;
  - `tool_calls` (last item): OpenAI `tool_calls` (only the first with `parallel_tool_calls: false`), and
    `finish_reason` "tool_calls" when there are any.
`chat_prompt_ids` renders a conversation (with tools) through the checkpoint's own chat template.
"""
from __future__ import annotations

from serving.api.errors import bad_request


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None) -> list[int]:
    """Token ids of the conversation rendered with Llama 4's chat template (tools in the first user message)."""
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tools=tools or None, add_generation_prompt=True,
                                             tokenize=False)
    except TemplateError as e:  # the template's own raise_exception, e.g. tools without a user message
        raise bad_request(f"The chat template refused the messages: {e}", param="messages",
                          code="invalid_value") from None
    return tokenizer.encode(text, add_special_tokens=False)


def engine_extras(job: dict) -> dict:
    """SamplingParams keywords that are not plain request fields: the grammar, raw special tokens for tools."""
    from serving.engine.params import StructuredOutputsParams

    out = {}
    if job.get("structured"):
        out["structured_outputs"] = StructuredOutputsParams(**job["structured"])
    return out


def _positions(lps, k: int | None) -> list:
    """Engine PositionLogprobs -> [token, logprob, top]: the chosen token is the dict's first entry."""
    out = []
    for pos in lps:
        if pos is None:
            out.append(None)
            continue
        items = list(pos.items())
        _, chosen = items[0]
        top = sorted((lp for _, lp in items if lp.rank <= (k or 0)), key=lambda lp: lp.rank)
        out.append([chosen.decoded_token, chosen.logprob, [[lp.decoded_token, lp.logprob] for lp in top]])
    return out


class Answer:
    """Accumulates one request's deltas into the replica's items (see the module docstring)."""

    def __init__(self, tokenizer, job: dict, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.k = job["sampling"].get("logprobs")
        self.parser = None
        if job.get("tool_names"):
            from serving.api.tools import ToolStreamParser

            self.parser = ToolStreamParser(tokenizer, set(job["tool_names"]), job["sampling"].get("stop"))
        self.one_call = not job.get("parallel_tool_calls", True)
        self.first: dict = {}
        if job.get("echo"):
            prompt = job.get("prompt")
            self.first["prompt_text"] = prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids)
        self.prompt_ids = prompt_ids
        self._text: list[str] = []
        self._lps: list = []

    def add(self, delta) -> None:
        if self.parser is not None:
            self._text.append(self.parser.feed(delta.new_token_ids))
        else:
            self._text.append(delta.new_text)
        if delta.logprobs is not None:
            self._lps.extend(_positions(delta.logprobs, self.k))
        if delta.prompt_logprobs is not None:
            first = [self.tokenizer.decode([self.prompt_ids[0]]), None, None]
            self.first["prompt_logprobs"] = [first] + _positions(delta.prompt_logprobs[1:], self.k)

    def take(self, finish_reason: str | None) -> dict:
        """What accumulated since the last call; with `finish_reason`, also the parsed tool calls."""
        item = {"text": "".join(self._text)}
        if self.k is not None:
            item["logprobs"] = self._lps
        self._text, self._lps = [], []
        if self.first:
            item.update(self.first)
            self.first = {}
        if finish_reason is not None and self.parser is not None:
            rest, calls = self.parser.finish()
            item["text"] += rest
            calls = calls[:1] if self.one_call else calls  # parallel_tool_calls=false: the first call only
            if calls:
                item["tool_calls"] = [c.openai() for c in calls]
                if finish_reason == "stop":
                    item["finish_reason"] = "tool_calls"
        return item
