"""The FlowFabric server: the boot (`app`, `config`, `embedded`) over three layers.

`valkey` (store, keys, codec, errors, function declarations) <- `engine` (scheduler, scanners,
event hub, orchestration) <- `api` (interceptors, servicers, watches). Imports point downwards
only; docs/architecture.md describes each layer.
"""
