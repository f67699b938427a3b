// Renders an Ollama TEMPLATE with Go's text/template, as Ollama does: the template gets .Messages (each with .Role
// and .Content) and .System. Reads {"template": "...", "messages": [...], "system": "..."} as JSON on stdin and
// prints the rendered prompt. Used by tests/test_real_model.py to check Backprop's Modelfile TEMPLATE.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Request struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
	System   string    `json:"system"`
}

func main() {
	var request Request
	if err := json.NewDecoder(os.Stdin).Decode(&request); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("ollama").Parse(request.Template))
	data := map[string]any{"Messages": request.Messages, "System": request.System}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
