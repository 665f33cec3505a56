"""DDP by hand (trainer.strategy=handmade): what DistributedDataParallel does in a training step, in
one short class, so you can read it. It trains the same weights as torch's DDP (the tests check it).

1. At the start every rank takes rank 0's weights (broadcast): all copies begin equal.
2. The parameters go into buckets of about bucket_cap_mb, in reverse order of the model's layers:
   backward() computes the last layer's gradients first, so the first bucket fills first, and the
   last one to fill holds the first layers and the token embedding.
3. A hook on every parameter (register_post_accumulate_grad_hook) runs as soon as backward() has
   written that parameter's .grad. When the last gradient of a bucket is in, the bucket's
   gradients are copied into one flat buffer and one all_reduce of it starts, asynchronously
   (async_op=True): the sum travels between the ranks while backward() computes the earlier
   layers' gradients.
4. Before the optimizer step, wait for every bucket, divide by the world size (a mean, as DDP takes;
   Gloo has no AVG) and copy the means back into the parameters' .grad.
5. On gradient-accumulation micro-steps before the last (no_sync()), the hooks do nothing: the
   gradients add up locally and go out once, summed, on the last micro-step.

What torch's DDP adds: its buckets are the gradients' own storage (gradient_as_bucket_view, no
copy), it finds parameters that got no gradient (find_unused_parameters), communication hooks,
and it is C++.
"""
import contextlib

import torch
import torch.distributed as dist


class Bucket:
    def __init__(self, params: list):
        self.params = params
        self.buffer = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype,
                                  device=params[0].device)
        self.ready = 0  # parameters whose gradient this backward() has written
        self.work = None  # the all-reduce on its way


class HandmadeDDP:
    def __init__(self, model: torch.nn.Module, bucket_cap_mb: float, world_size: int):
        self.world_size = world_size
        self.sync = True  # False inside no_sync(): the gradients only accumulate
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
        # parameters() lists the embeddings first and the last block last; gradients come the
        # other way.
        self.buckets, params, size = [], [], 0
        for p in reversed([p for p in model.parameters() if p.requires_grad]):
            params.append(p)
            size += p.numel() * p.element_size()
            if size >= bucket_cap_mb * 2**20:
                self.buckets.append(Bucket(params))
                params, size = [], 0
        if params:
            self.buckets.append(Bucket(params))
        self.bucket_of = {p: bucket for bucket in self.buckets for p in bucket.params}
        for p in self.bucket_of:
            p.register_post_accumulate_grad_hook(self._gradient_ready)
        self.next_to_send = 0  # buckets go out in order: see _gradient_ready

    def _gradient_ready(self, param: torch.Tensor):
        """Runs inside backward(), once param.grad holds this backward's whole gradient."""
        if not self.sync:
            return
        self.bucket_of[param].ready += 1
        # Every rank must start the same all-reduces in the same order, or a rank would sum its
        # bucket 2 with another rank's bucket 3. So a full bucket waits until every bucket before
        # it has gone out.
        while self.next_to_send < len(self.buckets):
            bucket = self.buckets[self.next_to_send]
            if bucket.ready < len(bucket.params):
                break
            torch.cat([p.grad.reshape(-1) for p in bucket.params], out=bucket.buffer)
            # async_op=True: returns at once; Gloo's threads (NCCL's stream) sum in the background
            bucket.work = dist.all_reduce(bucket.buffer, async_op=True)
            self.next_to_send += 1

    def finish_gradient_sync(self):
        """After the last backward() of a step: each rank's .grad becomes the ranks' mean."""
        if not self.sync:
            return
        if self.next_to_send < len(self.buckets):
            missing = [p for p in self.buckets[self.next_to_send].params if p.grad is None]
            raise RuntimeError(f"{len(missing)} parameter(s) got no gradient in this backward(), "
                               "so their bucket never went out (torch's DDP finds them with "
                               "find_unused_parameters=True)")
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.buffer /= self.world_size
            offset = 0
            for p in bucket.params:
                p.grad.copy_(bucket.buffer[offset:offset + p.numel()].view_as(p.grad))
                offset += p.numel()
            bucket.ready, bucket.work = 0, None
        self.next_to_send = 0

    @contextlib.contextmanager
    def no_sync(self):
        """Accumulate this backward()'s gradients locally, send nothing."""
        self.sync = False
        try:
            yield
        finally:
            self.sync = True
