"""Metadata keys lowbit writes on FX nodes. One place, so no pass spells them by hand."""

HANDLE = "lowbit_handle"        # int: stable debug handle, given at capture, inherited by replacements
MODULE = "lowbit_module"        # str: module path of a linear/embedding in the source model
TYPE = "lowbit_type"            # str: "f32[s0,s1,576]": dtype and shape, symbolic dims by name
CREATED_BY = "lowbit_created_by"  # str: the pass that created the node (provenance instrument)
QUANT = "lowbit_quant"          # dict: how a linear's weight is stored (method, bits, group, sym, ...)

SERIALIZED = (HANDLE, MODULE, TYPE, CREATED_BY, QUANT)
