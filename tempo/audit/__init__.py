"""`tempo audit`: what relays can learn from what they legitimately receive, measured by attacks.

Untrusted-side tooling: it reads what relays hold (their recordings, `tempo relay --record`, or
the same view captured in-process) and runs attacks that use nothing else but public knowledge
(the architecture, the data distribution, the scheme), never the keys. Ground truth from the
enclave side is used for scoring only.

- `view`: what a relay saw (`RunView`, one `ProductView` per offloaded product part), loaded
  from a recording; and the ground truth (`RunTruth`) the audit's own runs keep for scoring.
- `capture`: a short private training whose relay view and truth are captured in-process.
"""
