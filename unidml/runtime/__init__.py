"""Where and how this process computes: its device, its numeric precision, its process group.

A leaf package like `config`, `errors` and `seeding`: every layer may import it, and it imports
nothing from the rest of unidml except those leaves (docs/design.md, "Import direction").
"""
