"""Deep models as feature producers: batch jobs that write embedding tables (text and image)."""
