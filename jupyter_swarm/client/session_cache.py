"""transformers' view of an inference session: a ``Cache`` whose keys and values live on the servers.

``generate()`` threads a cache object through the model's forward calls. Ours holds no tensors: its length is the
session's, and ``crop`` steps the session back, which is what transformers' assisted generation (a draft model or
prompt lookup) needs to drop the candidate tokens the model rejected.
"""

from __future__ import annotations

from transformers import Cache

from jupyter_swarm.client.inference import InferenceSession


class SessionCache(Cache):
    """The attention caches of an :class:`InferenceSession`, as a transformers ``Cache``.

    ``offset``: positions at the start of the session that are not tokens (trainable prompts), hidden from
    transformers' token counts.
    """

    is_compileable = False

    def __init__(self, session: InferenceSession, offset: int = 0):
        super().__init__(layers=[])
        self.session = session
        self.offset = offset

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens the servers hold for this session (the position the next token takes)."""
        return max(0, self.session.position - self.offset)

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a positive value: keep that many, as transformers' legacy
        form). The servers drop them from their caches with the session's next step."""
        length = self.get_seq_length()
        keep = tokens_to_remove if tokens_to_remove > 0 else length + tokens_to_remove
        if keep == length:
            return
        self.session.rollback(self.offset + keep)

    @property
    def is_croppable(self) -> bool:
        return True

    def activate_past_recording(self) -> None:
        """Nothing to record: the servers' caches can always step back (full attention)."""

    def __repr__(self) -> str:
        return f"SessionCache(tokens={self.get_seq_length()}, offset={self.offset})"
