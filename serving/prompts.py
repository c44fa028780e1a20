"""Which task prompt a request gets, and never a second one.

The model was trained with a task prefix on every text ("search_query: ", "search_document: ", ...).
Upstream's card tells users to write the prefix into the text themselves, while our
sentence-transformers files set a default prompt: sentence-transformers then embeds
"search_document: search_query: ...". The server knows the prefixes, so:

  - an explicit prompt (prompt_name, or its alias input_type) applies to every text that does not
    already begin with one of the model's prefixes;
  - without one, a text that already has a prefix is left as it is, and any other gets the
    default prompt (document, as in sentence-transformers);
  - token-id inputs are taken as they are: the caller tokenised them, prefix included or not.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

# input_type values other APIs use (Cohere, Voyage, our own prefixes' words), mapped to prompt names
ALIASES = {
    "search_query": "query",
    "search_document": "document",
    "doc": "document",
    "documents": "document",
    "queries": "query",
}


@dataclass
class PromptChoice:
    name: Optional[str]  # the prompt applied to texts without a prefix; None: none at all
    texts: List[str]  # what is tokenised
    already_prefixed: int  # texts left as they were because they began with a model prefix


class Prompts:
    def __init__(self, prompts: Dict[str, str], default: Optional[str]):
        self.prompts = dict(prompts)
        self.default = default if default in self.prompts else None
        # longest first, so "search_document: " is not mistaken for a shorter prefix of itself
        self.prefixes = sorted({p for p in self.prompts.values() if p}, key=len, reverse=True)
        self._lower = {k.lower(): k for k in self.prompts}

    @property
    def names(self) -> List[str]:
        return sorted(self.prompts)

    def resolve(self, name: Optional[str]) -> Optional[str]:
        """The model's prompt name for what a client sent, or None; raises KeyError if unknown."""
        if name is None:
            return None
        key = name.strip()
        if key in self.prompts:
            return key
        key = ALIASES.get(key.lower(), key.lower())
        if key in self._lower:
            return self._lower[key]
        raise KeyError(name)

    def has_prefix(self, text: str) -> bool:
        return any(text.startswith(p) for p in self.prefixes)

    def apply(self, texts: Sequence[str], name: Optional[str]) -> PromptChoice:
        chosen = name if name is not None else self.default
        prefix = self.prompts.get(chosen, "") if chosen else ""
        out, kept = [], 0
        for t in texts:
            if self.has_prefix(t):
                out.append(t)
                kept += 1
            else:
                out.append(prefix + t)
        return PromptChoice(chosen if prefix else None, out, kept)
