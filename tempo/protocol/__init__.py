"""The wire protocol between enclave, off-loader and relays: the one place the format lives.

Every message is a ZeroMQ multipart message. Frame 0 is a msgpack map (the header); frames 1..k
are raw, contiguous tensor bytes, sent zero-copy. The header lists each tensor's dtype (from an
allow-list) and shape, and the receiver checks every byte length against them before it builds
a tensor. Every header carries ``v = PROTOCOL_VERSION``; a different major version is refused.
Every header field has one type, checked here on arrival (`FIELDS`, `decode_header`): a
handler never meets a list where it expects a string. Fields a peer does not know are ignored,
so a minor version may add some. Each op is one message class (`tempo.protocol.messages`:
`Submit`, `Forward`, `Error`, …), built and read through `to_frames` and `parse`.

Requests carry a fresh request id ``id``, its binding ``bind = [job, step, layer, part]`` and
``digest``, a SHA-256 (128 bits) of the input tensors' bytes. A relay refuses inputs whose
digest does not match and echoes it in its result (the off-loader can turn digests off). A reply is accepted only if it answers an outstanding
request with the same id, binding and digest, from the peer it was sent to.

Ops (``op``), by direction:

- enclave → off-loader: ``submit`` (a forward or backward part, by arena descriptors),
  ``stage`` (a forward's weight operand, ahead of it), ``release`` (drop a binding's cached
  operands on the relays), ``release_job`` (drop a job and its arena; since 2.3), ``ping``,
  ``quarantine`` (stop using a relay, named or by the request it holds; its parts go to the others).
- off-loader → enclave: ``done`` (outputs written into the arena, and which relay computed
  them), ``error``, ``pong`` (with the sizes of the off-loader's tables, since 2.1), ``relay_event`` (a relay that held this enclave's parts was lost
  or quarantined).
- off-loader → relay: ``forward`` (A', B' → C'), ``backward`` (D' with the cached A', B' →
  T1', T2'), ``backward_full`` (A', B', D' → T1', T2', for when the relay holding the cache
  died), ``stage``, ``release``, ``release_job``, ``ping``, ``sealed`` (the shares mode: one or two blobs sealed for the
  relay's pool → one sealed answer; `tempo.protocol.sealed`).
- relay → off-loader: ``ready`` (device, free memory, and ``pool`` for a pool member),
  ``heartbeat``, ``result``, ``error``, ``pong``.

An ``error`` carries a ``code`` (`ErrorCode`, since 2.3) besides its ``reason``: every decision a
peer takes on an error (send a part again with its operands, give up on a request) reads the code.

Protection modes (since 2.4): every work request (``submit``, ``stage``, ``forward``, ``backward``,
``backward_full``) carries a ``mode``, one of `MODES`; one without (a 2.3 peer) is ``masked``.

- ``masked``: the operands are obfuscated products (masked A', B', D'; or, in the shares mode,
  sealed blobs): a relay sees nothing it can read back to the plaintext.
- ``asymml``: by design the operands are NOT masked: plaintext weights and clipped, noisy
  residuals of the inputs (AsymML; `tempo.core.asymml` accounts for the privacy of the noise). The
  relay sees them as they are, and a recording (`tempo relay --record`) holds them.

A job is in one mode, the mode of its first work request. The off-loader and every relay refuse
a request in another mode, or a forward whose staged operand came in another one, with an
``error`` of code ``mode_mismatch`` (the enclave's mistake: no relay is blamed, nothing is
retried); a ``sealed`` submit is ``masked`` only. ``release_job`` forgets the job's mode.

A ``submit`` of kind ``sealed`` names a ``pool``; the off-loader gives it only to a relay that
announced that pool, and gives a pool's relays nothing else. It cannot read what it routes: each
blob is sealed (AES-GCM) under the pool's key, which only the enclave and the pool's relays hold.
"""

from __future__ import annotations

# The protocol's modules: `codec` (frames, tensors, digests, limits, field types), `messages`
# (a class per op, and the registry), `errors` (error codes), `sealed` (the shares mode's blobs).
# Their public names are importable from here, as before.
from tempo.protocol.codec import *  # noqa: F403
from tempo.protocol.errors import ErrorCode, ProtocolError  # noqa: F401
from tempo.protocol.messages import *  # noqa: F403
from tempo.protocol.codec import _unpack  # noqa: F401 - read with the same limits elsewhere

