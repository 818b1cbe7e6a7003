"""Generated ids -> text pieces as they are made, with stop strings.

The whole generated sequence is decoded at each step (as transformers' streamers do), so
tokenizers that merge or strip spaces across tokens still give the right text. A piece is held
back while the text ends in an incomplete character or in what may be the start of a stop string.
"""


class TextStream:
    """Feeds token ids, yields text pieces; `stopped` once a stop string appears.

    Example:
        >>> stream = TextStream(tokenizer, stop=["\\n\\n"])  # doctest: +SKIP
        >>> stream.push(42)  # doctest: +SKIP
        'def'
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.emitted = ""
        self.stopped = False
        self.text = ""

    def push(self, token_id: int) -> str:
        """Adds a token; returns the text that is now certain (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        return self._advance(final=False)

    def finish(self) -> str:
        """Returns whatever was held back, once generation has ended."""
        return "" if self.stopped else self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids)
        cut = min((i for s in self.stop if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            text, self.stopped, final = text[:cut], True, True
        self.text = text
        certain = len(text)
        if not final:
            # An incomplete UTF-8 sequence decodes to one or more U+FFFD: wait for the next token.
            certain -= len(text) - len(text.rstrip("\ufffd"))
            for s in self.stop:  # hold back a tail that could begin a stop string
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:n]):
                        certain = min(certain, len(text) - n)
                        break
        if certain <= len(self.emitted) or not text.startswith(self.emitted):
            return ""
        piece = text[len(self.emitted):certain]
        self.emitted += piece
        return piece
