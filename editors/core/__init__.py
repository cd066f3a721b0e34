"""The locate-then-edit core shared by ROME, MEMIT and their descendants.

keys: k = input of the MLP output projection at the subject's last token, averaged over
      context prefixes.
values: the residual-stream change at a layer that makes the model say the new target.
updates: closed-form weight updates that map keys to the new values.
"""
