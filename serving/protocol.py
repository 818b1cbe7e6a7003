"""OpenAI's request and error formats: the fields each route takes, checked one by one, and errors as OpenAI's JSON.

Every error the server returns is an `APIError`: `{"error": {"message", "type", "param", "code"}}`.
"""

import base64
import binascii
import io

from starlette.responses import JSONResponse

from zoo.generation import Sampler


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def field(body: dict, name: str, kinds, default=None, required=False, check=None, message=""):
    if name not in body or body[name] is None:
        if required:
            raise APIError(400, f"'{name}' is a required property", param=name, code="missing_required_parameter")
        return default
    value = body[name]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise APIError(400, f"'{name}' must be {message or kinds}, got {value!r}", param=name, code="invalid_type")
    if not isinstance(value, kinds) or (check is not None and not check(value)):
        raise APIError(400, f"'{name}' must be {message}, got {value!r}", param=name, code="invalid_value")
    return value


# top_k, ignore_eos and return_tokens_as_token_ids are vLLM's extensions to OpenAI's parameters.
COMMON_FIELDS = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n",
                 "stream", "stream_options", "user", "logprobs", "presence_penalty", "frequency_penalty", "ignore_eos",
                 "return_tokens_as_token_ids"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "top_logprobs", "response_format", "tools", "tool_choice"}


PROMPT_FORMS = "a string, a list of token ids, or a list of strings or of token-id lists"
MAX_PROMPTS, MAX_N, MAX_LOGPROBS = 64, 16, 20


def text(value: str, where: str) -> str:
    """Text a client sent, refused if it cannot be UTF-8 (a lone surrogate such as "\\ud800")."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{where} holds {value[e.start:e.end]!r}, which is not valid Unicode text (a lone "
                            "surrogate)", param=where.split("[")[0], code="invalid_value") from None
    return value


def chat_messages(body: dict) -> list[dict]:
    """`messages` as the chat template takes them: each a role and text content (a string, or OpenAI's list of
    {"type": "text", "text": ...} parts, joined)."""
    messages = field(body, "messages", list, required=True, check=bool, message="a non-empty list")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise APIError(400, f"{where} must be an object with a string 'role' and 'content'", param="messages",
                           code="invalid_type")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{where}.content: expected text parts {{\"type\": \"text\", \"text\": "
                                    "string}; this server takes text only", param="messages", code="invalid_type")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content must be a string or a list of text parts, got "
                                f"{type(content).__name__}", param="messages", code="invalid_type")
        out.append({**m, "role": text(m["role"], f"{where}.role"), "content": text(content, f"{where}.content")})
    return out


def completion_prompts(body: dict, tokenizer) -> list[tuple[list[int], str | None]]:
    """OpenAI's `prompt` as (token ids, the text as sent) per prompt: text (BOS added as the tokenizer says, special
    tokens' strings read as text), or token ids taken as they are (as OpenAI and vLLM do; the engine refuses ids
    outside the vocabulary). A list of strings or of id lists is several prompts."""
    prompt = field(body, "prompt", (str, list), required=True, message=PROMPT_FORMS)
    several = isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt)
    prompts = prompt if several else [prompt]
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"'prompt' holds {len(prompts)} prompts; at most {MAX_PROMPTS} per request", param="prompt")
    out = []
    for i, one in enumerate(prompts):
        where = f"prompt[{i}]" if several else "prompt"
        if not one:
            raise APIError(400, f"'{where}' is empty", param="prompt")
        if isinstance(one, str):  # a special token's string in the text stays text (no injected turns)
            out.append((tokenizer.encode(text(one, where), parse_special=False), one))
        elif all(isinstance(t, int) and not isinstance(t, bool) for t in one):
            out.append((list(one), None))
        else:
            raise APIError(400, f"'prompt' must be {PROMPT_FORMS}, got {body['prompt']!r:.200}", param="prompt",
                           code="invalid_type")
    return out


def sampling(body: dict, allowed: set[str], limit: int) -> dict:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0],
                       code="unknown_parameter")
    for name, neutral in (("presence_penalty", (None, 0, 0.0)), ("frequency_penalty", (None, 0, 0.0)),
                          ("suffix", (None, "")), ("tools", (None, []))):
        if body.get(name) not in neutral:
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    if body.get("response_format") not in (None, {"type": "text"}):
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    n = field(body, "n", int, 1, check=lambda v: 1 <= v <= MAX_N, message=f"an integer from 1 to {MAX_N}")
    if body.get("best_of") not in (None, n):
        raise APIError(400, "'best_of' is not supported by this server (only best_of == n)", param="best_of",
                       code="unsupported_parameter")
    chat = "messages" in allowed
    if chat:  # the chat shape: logprobs a boolean, top_logprobs the alternatives
        wanted = field(body, "logprobs", bool, False, message="a boolean")
        top = field(body, "top_logprobs", int, None, check=lambda v: 0 <= v <= MAX_LOGPROBS,
                    message=f"an integer from 0 to {MAX_LOGPROBS}")
        if top is not None and not wanted:
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        logprobs, echo = (top or 0) if wanted else None, False
    else:  # the legacy shape: logprobs the number of alternatives
        logprobs = field(body, "logprobs", int, None, check=lambda v: 0 <= v <= MAX_LOGPROBS,
                         message=f"an integer from 0 to {MAX_LOGPROBS}")
        echo = field(body, "echo", bool, False, message="a boolean")
    least = 0 if echo else 1  # max_tokens 0 with echo scores the prompt only, as vLLM allows
    max_tokens = field(body, "max_completion_tokens", int, None, check=lambda v: v >= least, message="a positive integer")
    if max_tokens is None:
        max_tokens = 16
    max_tokens = field(body, "max_tokens", int, max_tokens, check=lambda v: v >= least,
                       message="a positive integer (0 only with echo)")
    if max_tokens > limit:
        raise APIError(400, f"'max_tokens' is {max_tokens}; this server allows at most {limit}", param="max_tokens")
    temperature = field(body, "temperature", (int, float), 1.0, check=lambda v: 0 <= v <= 2, message="in [0, 2]")
    top_p = field(body, "top_p", (int, float), 1.0, check=lambda v: 0 < v <= 1, message="in (0, 1]")
    top_k = field(body, "top_k", int, 0, check=lambda v: v >= 0 or v == -1, message="an integer >= 0 (or -1)")
    seed = field(body, "seed", int, None, message="an integer")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop)):
        raise APIError(400, f"'stop' must be a string or a list of at most 4 non-empty strings, got {stop!r}", param="stop")
    stream = field(body, "stream", bool, False, message="a boolean")
    ignore_eos = field(body, "ignore_eos", bool, False, message="a boolean")
    options = field(body, "stream_options", dict, {}, message="an object")
    return dict(max_tokens=max_tokens, sampler=Sampler(temperature=float(temperature), top_p=float(top_p),
                                                      top_k=max(top_k, 0), seed=seed),
                stop=stop or [], stream=stream, include_usage=bool(options.get("include_usage")), ignore_eos=ignore_eos,
                n=n, logprobs=logprobs, echo=echo,
                token_ids=field(body, "return_tokens_as_token_ids", bool, False, message="a boolean"))


def base64_images(body: dict) -> list[bytes]:
    """The image files of a JSON classification request: `images` (or one `image`), base64 or data URLs."""
    unknown = sorted(set(body) - {"model", "images", "image", "top_k"})
    if unknown:
        raise APIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0])
    images = body.get("images", [body["image"]] if "image" in body else None)
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
        raise APIError(400, "'images' must be a non-empty list of base64-encoded image files", param="images")
    blobs = []
    for i, data in enumerate(images):
        try:
            blobs.append(base64.b64decode(data.split(",", 1)[-1] if data.startswith("data:") else data, validate=True))
        except (binascii.Error, ValueError):
            raise APIError(400, f"images[{i}] is not valid base64", param="images") from None
    return blobs


def decode_image(blob: bytes, index: int, max_pixels: int):
    """A PIL image, refused before decoding if its header declares more than `max_pixels` pixels (the error
    names the image and its size, never a server object or path)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(blob))
        width, height = image.size
        if width * height > max_pixels:
            raise APIError(413, f"images[{index}] is {width}x{height} = {width * height} pixels; the limit is "
                                f"{max_pixels}", param="images", code="image_too_large")
        image.load()
        return image
    except UnidentifiedImageError:
        raise APIError(400, f"images[{index}] is not an image format Pillow reads (PNG, JPEG, WebP, ...)",
                       param="images") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise APIError(400, f"images[{index}] cannot be decoded: {type(e).__name__}", param="images") from None


def usage(prompts: list, tickets) -> dict:
    """Token counts of a response: each prompt once (its n choices share it), every choice's completion."""
    prompt, completion = sum(len(p) for p in prompts), sum(len(t.request.tokens) for t in tickets)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
