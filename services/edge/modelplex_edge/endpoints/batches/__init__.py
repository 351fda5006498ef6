"""/v1/batches: durable batch jobs whose lines run through the pipeline below interactive traffic."""
