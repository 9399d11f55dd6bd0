"""Named pipelines shipped with lowbit: name -> (pipeline text, one-line doc)."""

RECIPES: dict[str, tuple[str, str]] = {
    "w4-rtn": ("quantize-weights{method=rtn,bits=4,group=128,sym=false}",
               "int4 asymmetric round-to-nearest, group 128, on the unfolded weights (the default)"),
    "w4-gptq": ("quantize-weights{method=gptq,bits=4,group=128,sym=false}",
                "int4 asymmetric GPTQ (act-order, static groups), group 128, unfolded weights (needs --calib)"),
    "quarot-w4-gptq": ("fold-norms,fuse-rotations{kind=hadamard},insert-hadamard,"
                       "quantize-weights{method=gptq,bits=4,group=128,sym=false}",
                       "QuaRot-style random Hadamard rotations, then int4 asymmetric GPTQ, group 128 (needs --calib)"),
    "w4-gptq-g64": ("quantize-weights{method=gptq,bits=4,group=64,sym=false}",
                    "w4-gptq in groups of 64, a group every input width of the default model divides (needs --calib)"),
    "quarot-w4-gptq-g64": ("fold-norms,fuse-rotations{kind=hadamard},insert-hadamard,"
                           "quantize-weights{method=gptq,bits=4,group=64,sym=false}",
                           "quarot-w4-gptq in groups of 64 (needs --calib)"),
    "quarot-w4-gptq-deploy": ("fold-norms,fuse-rotations{kind=hadamard},insert-hadamard{r3=false},"
                              "quantize-weights{method=gptq,bits=4,group=128,sym=false},"
                              "quantize-weights{method=rtn,bits=8,group=128,sym=false,lm_head=true}",
                              "quarot-w4-gptq for deployment: lm_head packed too (int8), no R3 (it cancels in q k^T "
                              "and only serves KV-cache quantization), so decoding runs fewer online Hadamards (needs --calib)"),
    "gguf-q4_0": ("scale-channels,quantize-weights{method=gptq,bits=4,group=32,sym=true,offset=signed,clip=true}",
                  "AWQ-style channel scales (into the norms, values and up projections: the model's own tensor layout, "
                  "a tied output projection stays tied), then GPTQ with clipping on exactly llama.cpp's Q4_0 grid "
                  "(signed-extreme scales, groups of 32): a GGUF file of llama.cpp's own Q4_0 size (export --format "
                  "gguf) (needs --calib)"),
    "gguf-q4_0-rotated": ("fold-norms,fuse-rotations{kind=hadamard},"
                          "quantize-weights{method=gptq,bits=4,group=32,sym=true,clip=true}",
                          "rotations fused into the weights, then int4 symmetric GPTQ in groups of 32 with clipping: "
                          "llama.cpp's Q4_0 grid and nothing online; the rotation unties a tied output projection, so "
                          "the file is larger (export --format gguf; compressed-tensors too where 32 divides K) "
                          "(needs --calib)"),
    "gguf-q4_1": ("fold-norms,fuse-rotations{kind=hadamard},"
                  "quantize-weights{method=gptq,bits=4,group=32,sym=false,offset=min,clip=true}",
                  "rotations fused into the weights, then int4 GPTQ in groups of 32 with an fp16 minimum and clipping: "
                  "exactly llama.cpp's Q4_1 grid, nothing online (export --format gguf) (needs --calib)"),
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
    "finequant-w4": ("quantize-weights{method=finequant,bits=4,group=32}",
                     "FineQuant: int4 symmetric, group size chosen per matrix from per-channel down to 32"),
    "finequant-w8": ("quantize-weights{method=finequant,bits=8,group=32}",
                     "FineQuant: int8 symmetric, group size chosen per matrix from per-channel down to 32"),
    "squeezellm-w4": ("quantize-weights{method=squeezellm,bits=4,samples=32}",
                      "SqueezeLLM: 4-bit Fisher-weighted k-means lookup table per output row (needs --calib)"),
    "squeezellm-w3": ("quantize-weights{method=squeezellm,bits=3,samples=32}",
                      "SqueezeLLM: 3-bit Fisher-weighted k-means lookup table per output row (needs --calib)"),
    "squeezellm-w3-sparse": ("split-outliers{fraction=0.0045,sensitive=0.0005,samples=32},"
                             "quantize-weights{method=squeezellm,bits=3,samples=32}",
                             "SqueezeLLM dense-and-sparse: 0.45% outliers in fp16 CSR, 3-bit tables (needs --calib)"),
    "quarot-w3-sparse-gptq": ("fold-norms,fuse-rotations{kind=hadamard},insert-hadamard,"
                              "split-outliers{fraction=0.0045,sensitive=0.0005,samples=64},"
                              "quantize-weights{method=squeezellm,bits=3,samples=64,gptq=true}",
                              "random Hadamard rotations, 0.45% outliers in CSR, 3-bit SqueezeLLM tables with codes "
                              "chosen by GPTQ (needs --calib)"),
    "w4a8kv8": ("fold-norms,fuse-rotations{kind=hadamard},insert-hadamard,"
                "quantize-weights{method=gptq,bits=4,group=128,sym=false},"
                "quantize-activations{bits=8},quantize-kv{bits=8}",
                "random Hadamard rotations, int4 GPTQ weights, 8-bit per-token dynamic activations and KV cache "
                "(needs --calib)"),
    "w4a4kv4": ("fold-norms,fuse-rotations{kind=hadamard},insert-hadamard,"
                "quantize-activations{bits=4,clip=0.9},quantize-kv{bits=4,clip=0.95},"
                "quantize-weights{method=gptq,bits=4,group=128,sym=false,clip=true}",
                "QuaRot-style: random Hadamard rotations, 4-bit activations and KV cache, int4 GPTQ weights "
                "(MSE-clipped group ranges) calibrated on the 4-bit inputs (needs --calib)"),
    "w4a4kv4-learned": ("fold-norms,learn-rotations{steps=200,batch=1,seq=256,calib=64,lr=0.0,decay=true,loss=local,"
                        "smooth=true},fuse-rotations{kind=learned},insert-hadamard{kind=learned},"
                        "quantize-activations{bits=4,clip=0.9},quantize-kv{bits=4,clip=0.95},"
                        "quantize-weights{method=gptq,bits=4,group=128,sym=false,clip=true}",
                        "SpinQuant-style: R1/R2, online R3 (keys) and Kronecker-factored R4, and per-channel scales "
                        "on the values and down inputs learned against the 4-bit activation and KV quantizers (each "
                        "linear's output error, recorded inputs), then int4 GPTQ weights (MSE-clipped group ranges) "
                        "calibrated on the 4-bit inputs (needs --calib)"),
    "frontier-w4": ("fold-norms,fuse-rotations{kind=hadamard},insert-hadamard,"
                    "quantize-weights{method=gptq,bits=4,group=128,sym=false,clip=true,refine=2,promote=5,max_bpw=4.25}",
                    "the best recipe at 4.25 bits per weight: random Hadamard rotations, GPTQ with clipped group ranges "
                    "and refined scales and codes, 4 bits with 5 for the linears where the measured sensitivity per "
                    "extra byte is highest, as many as fit in 4.25 bits per weight (needs --calib)"),
    "frontier-w3.5": ("fold-norms,fuse-rotations{kind=hadamard},insert-hadamard,"
                      "quantize-weights{method=gptq,bits=3,group=128,sym=false,clip=true,refine=2,promote=4,max_bpw=3.5}",
                      "the best recipe at 3.5 bits per weight: random Hadamard rotations, GPTQ with clipped group ranges "
                      "and refined scales and codes, "
                      "3 bits with 4 for the linears where the measured sensitivity per extra byte is highest, as many as "
                      "fit in 3.5 bits per weight (needs --calib)"),
    "fp": ("fold-norms", "no quantization: norms folded only (an exact baseline)"),
}
RECIPES["frontier-w4a4kv4"] = (RECIPES["w4a4kv4-learned"][0].replace("insert-hadamard{kind=learned},",
                                                                       "insert-hadamard{kind=learned},shape-noise,"),
                                "the best recipe at W4A4KV4: w4a4kv4-learned with online matrices that shape the 4-bit "
                                "noise on each branch's input and on the keys (shape-noise) (needs --calib)")

DEFAULT_RECIPE = "w4-rtn"
