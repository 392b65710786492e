"""GPU relays (untrusted): receive masked operands, multiply, cache them for the backward pass.

Not built yet (issue 3).
"""
