"""One provider's world: the actor task, its state machines and its upstream transport."""
