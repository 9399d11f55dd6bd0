"""Named pipelines shipped with lowbit: name -> (pipeline text, one-line doc)."""

RECIPES: dict[str, tuple[str, str]] = {
    "w4-rtn": ("fold-norms,quantize-weights{method=rtn,bits=4,group=128,sym=true}",
               "int4 symmetric round-to-nearest, group 128 (4.125 bits/weight)"),
    "w4-rtn-perchannel": ("fold-norms,quantize-weights{method=rtn,bits=4,group=-1,sym=true}",
                          "int4 symmetric round-to-nearest, one scale per output channel"),
    "w3-rtn": ("fold-norms,quantize-weights{method=rtn,bits=3,group=128,sym=true}",
               "int3 symmetric round-to-nearest, group 128"),
    "w4-rtn-g32-asym": ("fold-norms,quantize-weights{method=rtn,bits=4,group=32,sym=false}",
                        "int4 asymmetric round-to-nearest, group 32 (the GGUF Q4_1 grid)"),
    "w8-rtn": ("fold-norms,quantize-weights{method=rtn,bits=8,group=-1,sym=true}",
               "int8 symmetric per-channel round-to-nearest"),
    "fp": ("fold-norms", "no quantization: norms folded only (an exact baseline)"),
}

DEFAULT_RECIPE = "w4-rtn"
