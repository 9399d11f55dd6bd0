"""Named pipelines shipped with lowbit: name -> (pipeline text, one-line doc)."""

RECIPES: dict[str, tuple[str, str]] = {
    "w4-rtn": ("quantize-weights{method=rtn,bits=4,group=128,sym=false}",
               "int4 asymmetric round-to-nearest, group 128, on the unfolded weights (the default)"),
    "w4-gptq": ("quantize-weights{method=gptq,bits=4,group=128,sym=false}",
                "int4 asymmetric GPTQ (act-order, static groups), group 128, unfolded weights (needs --calib)"),
    "w4-rtn-sym": ("fold-norms,quantize-weights{method=rtn,bits=4,group=128,sym=true}",
                   "int4 symmetric round-to-nearest, group 128, norms folded first"),
    "w4-rtn-perchannel": ("fold-norms,quantize-weights{method=rtn,bits=4,group=-1,sym=true}",
                          "int4 symmetric round-to-nearest, one scale per output channel"),
    "w3-rtn": ("fold-norms,quantize-weights{method=rtn,bits=3,group=128,sym=true}",
               "int3 symmetric round-to-nearest, group 128"),
    "w4-rtn-g32-asym": ("fold-norms,quantize-weights{method=rtn,bits=4,group=32,sym=false}",
                        "int4 asymmetric round-to-nearest, group 32"),
    "w8-rtn": ("fold-norms,quantize-weights{method=rtn,bits=8,group=-1,sym=true}",
               "int8 symmetric per-channel round-to-nearest"),
    "quarot-w4": ("fold-norms,fuse-rotations{kind=hadamard},insert-hadamard,"
                  "quantize-weights{method=rtn,bits=4,group=-1,sym=true}",
                  "QuaRot-style: random Hadamard R1/R2, online R3/R4, int4 per-channel RTN weights"),
    "spinquant-w4": ("fold-norms,learn-rotations{steps=50,batch=2,seq=256},fuse-rotations{kind=learned},"
                     "insert-hadamard,quantize-weights{method=rtn,bits=4,group=-1,sym=true}",
                     "SpinQuant-style: R1/R2 learned under int4 per-channel RTN (needs --calib)"),
    "spinquant-w4-gptq": ("fold-norms,learn-rotations{steps=50,batch=2,seq=256},fuse-rotations{kind=learned},"
                          "insert-hadamard,quantize-weights{method=gptq,bits=4,group=-1,sym=true}",
                          "SpinQuant-style rotations, then int4 per-channel GPTQ weights (needs --calib)"),
    "fp": ("fold-norms", "no quantization: norms folded only (an exact baseline)"),
}

DEFAULT_RECIPE = "w4-rtn"
