//! Two gate servers on one Redis: written in the next step.
