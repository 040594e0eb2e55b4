// Renders a Modelfile TEMPLATE the way Ollama does for a chat request whose template ranges over
// .Messages: Go's text/template (missingkey=zero) over a map holding System (every system
// message's text, joined by a blank line) and Messages (all messages, consecutive ones of one
// role merged, joined by a blank line), as in ollama/ollama template/template.go.
// Input on stdin: {"template": "...", "messages": [{"role": "...", "content": "..."}]}.
// Written for snugtune's tests (tests/test_export_ollama_system.py), which run it when Go is here.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

func main() {
	var in struct {
		Template string    `json:"template"`
		Messages []Message `json:"messages"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var system []string
	var msgs []*Message
	for i := range in.Messages {
		m := in.Messages[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(msgs) > 0 && msgs[len(msgs)-1].Role == m.Role && m.Role != "tool" {
			msgs[len(msgs)-1].Content += "\n\n" + m.Content
		} else {
			msgs = append(msgs, &m)
		}
	}
	t, err := template.New("").Option("missingkey=zero").Parse(in.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(3)
	}
	err = t.Execute(os.Stdout, map[string]any{
		"System": strings.Join(system, "\n\n"), "Messages": msgs, "Tools": nil, "Response": "",
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(4)
	}
}
