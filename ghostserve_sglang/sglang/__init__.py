"""The SGLang layer: everything that knows SGLang's scheduler, KV pool and processes, in four parts
(``patching``, ``operations``, ``restart``, ``protection``; see the package docstring for their floors).

May import: nothing else in the package (each part declares its own).
"""
