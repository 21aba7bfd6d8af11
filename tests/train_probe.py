"""A trainer's loss on one fixed batch, before and after a run (shared by the training tests; not a test module)."""
import torch

from t2iadapter.train.data import make_loader


def first_batch(trainer, batch_size: int):
    """The first batch the trainer's own data stream gives (no workers, no shuffling seed beyond the stream's)."""
    return next(iter(make_loader(trainer.stream, batch_size, 0, 1, 0, 0)))


def fixed_loss(trainer, batch, repeats: int) -> float:
    """Mean loss over `repeats` draws with the same latents, noise and timesteps every call (the trainer's
    generator is reseeded, then restored, so measuring does not change the run)."""
    state = trainer.generator.get_state()
    trainer.generator.manual_seed(1234)
    with torch.no_grad():
        loss = sum(trainer.micro_loss(batch).item() for _ in range(repeats)) / repeats
    trainer.generator.set_state(state)
    return loss
