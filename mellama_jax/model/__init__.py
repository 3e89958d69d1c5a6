"""The model: LLaMA-2 in Flax NNX and what its forward pass needs.

`llama` (Llama, KV cache, parameter and FLOP counts), `attention` (xla, Pallas flash with segment ids, cudnn),
`lora` (adapters merged per layer, PEFT export), `sharding` (logical axis names -> mesh axes, the meshes).
Imports only the shared ground (config, checkpoint file names).
"""
