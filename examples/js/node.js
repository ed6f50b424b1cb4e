#!/usr/bin/env node
'use strict';
// A small JavaScript node: the same protocol as the Python SDK, another language.
const path = require('path');
const { Node } = require(path.join(__dirname, '..', '..', 'sdk', 'js', 'tasksprint.js'));

class ExampleNode extends Node {
  square(x) {
    return { result: x * x };
  }

  sum(...values) {
    return { result: values.reduce((total, value) => total + value, 0) };
  }

  rand() {
    return { result: this.random() };
  }
}

new ExampleNode().start();
