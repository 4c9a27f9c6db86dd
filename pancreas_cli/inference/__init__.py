"""pancseg's inference engine: the batched, region-restricted sliding window, export on the device, overlapped cases."""
