"""What training minimises: an objective turns a micro-batch into (summed loss, count, metrics).

One file per objective; `train()` takes any object with the `Objective` interface.
"""
