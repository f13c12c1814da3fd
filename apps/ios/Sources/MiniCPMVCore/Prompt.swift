import Foundation

/// Prompt building for one chat turn, a port of edge_runtime/processing/prompt.py for the
/// MiniCPM-V 4.6 family: render the chat template (optional system message, one user turn of images
/// then text, the assistant generation prompt), then replace the i-th image token the template wrote
/// with the i-th image's expanded placeholder (`<image_id>i</image_id>` prefix when use_image_id),
/// then tokenize the whole text.
///
/// The app runs no Jinja. The template is described by a ChatFormat (the literal pieces it writes
/// for a turn); `ChatFormat.fromTemplate` derives it from the bundle's chat_template.jinja by
/// checking that the template literally contains each piece the format claims, and refuses a
/// template it does not recognise rather than guess.

/// Token counts of one image: its downsampled source view and, if sliced, its tiles (row-major).
public struct ImageLayout: Sendable, Equatable {
    public var sourceTokens: Int
    /// [rows, cols] of tiles, or nil when the image is not sliced.
    public var grid: [Int]?
    /// One count per tile, row-major; empty when not sliced.
    public var tileTokens: [Int]

    public init(sourceTokens: Int, grid: [Int]?, tileTokens: [Int]) {
        self.sourceTokens = sourceTokens
        self.grid = grid
        self.tileTokens = tileTokens
    }

    public init(plan: SlicePlan) {
        self.init(sourceTokens: plan.tokenCounts[0], grid: plan.grid, tileTokens: Array(plan.tokenCounts.dropFirst()))
    }

    func check() throws {
        guard sourceTokens > 0, tileTokens.allSatisfy({ $0 > 0 }) else {
            throw CoreError.invalid(
                "image token counts must be positive integers: source \(sourceTokens), tiles \(tileTokens)")
        }
        if let grid, grid.count != 2 {
            throw CoreError.invalid("image grid must be [rows, cols], got \(grid)")
        }
        let expected = grid.map { $0[0] * $0[1] } ?? 0
        guard tileTokens.count == expected else {
            throw CoreError.invalid(
                "image grid \(grid.map { "\($0)" } ?? "null") needs \(expected) tile token counts, got \(tileTokens.count)"
            )
        }
    }
}

/// The rendered prompt and its token ids (what the app feeds the decoder).
public struct Prompt: Sendable, Equatable {
    public let text: String
    public let ids: [Int]
}

/// What the chat template writes around one turn.
public struct ChatFormat: Sendable, Equatable {
    public var systemPrefix: String
    public var userPrefix: String
    public var turnSuffix: String
    /// The assistant generation prompt (add_generation_prompt, enable_thinking false).
    public var generationPrompt: String
    /// The same with enable_thinking true.
    public var generationPromptThinking: String
    /// What the template writes for one image item (expanded afterwards).
    public var imageItem: String
    /// Whether the template trims each message's content (Jinja `| trim`, Python str.strip()).
    public var trimContent: Bool

    static let imStart = "<|im_start|>"
    static let imEnd = "<|im_end|>"
    static let noThink = "<think>\n\n</think>\n\n"
    static let think = "<think>\n"

    /// A Jinja string literal's text: "\n" written as backslash-n.
    static func jinjaLiteral(_ s: String) -> String {
        s.replacingOccurrences(of: "\n", with: "\\n")
    }

    /// The format of a bundle's chat template, recognised by the literal pieces it must contain;
    /// throws when the template is not the MiniCPM-V 4.6 ChatML one.
    public static func fromTemplate(_ template: String, imageToken: String) throws -> ChatFormat {
        let required = [
            "render_content(message.content) | trim",
            "'\(imStart)' + message.role + '\(jinjaLiteral("\n"))' + content + '\(jinjaLiteral(imEnd + "\n"))'",
            "message.role in ['system', 'user']",
            "{{- '\(jinjaLiteral(imStart + "assistant\n"))' }}",
            "{{- '\(jinjaLiteral(noThink))' }}",
            "{{- '\(jinjaLiteral(think))' }}",
            "{{- '\(imageToken)' }}",
            "{{- item.text }}",
        ]
        let missing = required.filter { !template.contains($0) }
        guard missing.isEmpty else {
            throw CoreError.invalid(
                "unsupported chat template (not the MiniCPM-V 4.6 ChatML template); it lacks: "
                    + missing.joined(separator: " | "))
        }
        return ChatFormat(
            systemPrefix: imStart + "system\n", userPrefix: imStart + "user\n", turnSuffix: imEnd + "\n",
            generationPrompt: imStart + "assistant\n" + noThink,
            generationPromptThinking: imStart + "assistant\n" + think, imageItem: imageToken, trimContent: true)
    }
}

/// Python's str.isspace() characters (what Jinja's trim strips).
func isPySpace(_ c: Unicode.Scalar) -> Bool {
    let v = c.value
    return (0x09...0x0D).contains(v) || (0x1C...0x20).contains(v) || v == 0x85 || v == 0xA0 || v == 0x1680
        || (0x2000...0x200A).contains(v) || v == 0x2028 || v == 0x2029 || v == 0x202F || v == 0x205F || v == 0x3000
}

/// Python str.strip() with no argument.
public func pyStrip(_ s: String) -> String {
    let scalars = Array(s.unicodeScalars)
    var start = 0
    var end = scalars.count
    while start < end && isPySpace(scalars[start]) { start += 1 }
    while end > start && isPySpace(scalars[end - 1]) { end -= 1 }
    var view = String.UnicodeScalarView()
    view.append(contentsOf: scalars[start..<end])
    return String(view)
}

/// Turns one user turn (images, then text) plus per-image token layouts into the model's prompt ids.
public struct PromptBuilder {
    public let tokenizer: Tokenizer
    public let format: ChatFormat
    public let useImageId: Bool
    public let enableThinking: Bool

    public init(tokenizer: Tokenizer, format: ChatFormat, useImageId: Bool = true, enableThinking: Bool = false) {
        self.tokenizer = tokenizer
        self.format = format
        self.useImageId = useImageId
        self.enableThinking = enableThinking
    }

    /// A builder for a bundle: its tokenizer, its chat_template.jinja and preprocessing.use_image_id.
    public init(tokenizer: Tokenizer, chatTemplate: String, useImageId: Bool = true, enableThinking: Bool = false)
        throws
    {
        let format = try ChatFormat.fromTemplate(chatTemplate, imageToken: tokenizer.named("image_token"))
        self.init(tokenizer: tokenizer, format: format, useImageId: useImageId, enableThinking: enableThinking)
    }

    /// The chat template rendered (placeholders not expanded).
    public func renderTemplate(_ text: String, imageCount: Int, system: String? = nil) -> String {
        let f = format
        var out = ""
        if let system {
            out += f.systemPrefix + content(system) + f.turnSuffix
        }
        let user = String(repeating: f.imageItem, count: imageCount)
        out += f.userPrefix + content(user + text) + f.turnSuffix
        return out + (enableThinking ? f.generationPromptThinking : f.generationPrompt)
    }

    /// Expanded text of one image (without the image-id prefix): `<image>pad x n</image>` then the
    /// tile rows joined by "\n", each row cols x `<slice>pad x m</slice>`.
    public func imagePlaceholder(_ layout: ImageLayout) throws -> String {
        try layout.check()
        let t = tokenizer
        let pad = try t.named("image_token")
        var out =
            try t.named("image_start_token") + String(repeating: pad, count: layout.sourceTokens)
            + t.named("image_end_token")
        guard let grid = layout.grid else { return out }
        var lines = [String]()
        for r in 0..<grid[0] {
            var line = ""
            for c in 0..<grid[1] {
                line +=
                    try t.named("slice_start_token") + String(repeating: pad, count: layout.tileTokens[r * grid[1] + c])
                    + t.named("slice_end_token")
            }
            lines.append(line)
        }
        out += lines.joined(separator: "\n")
        return out
    }

    /// Replaces each image token the template wrote with its full placeholder, in order.
    public func expandPlaceholders(_ rendered: String, images: [ImageLayout]) throws -> String {
        let imageToken = try tokenizer.named("image_token")
        let videoToken = try tokenizer.named("video_token")
        let pieces = rendered.components(separatedBy: imageToken)
        let nImages = pieces.count - 1
        let nVideos = rendered.components(separatedBy: videoToken).count - 1
        guard nImages == images.count, nVideos == 0 else {
            throw CoreError.invalid(
                "prompt has \(nImages) image and \(nVideos) video placeholders for \(images.count) images and 0 videos "
                    + "(does the text contain \(imageToken) or \(videoToken)?)")
        }
        var out = pieces[0]
        for (i, layout) in images.enumerated() {
            let prefix =
                useImageId
                ? try tokenizer.named("image_id_start_token") + "\(i)" + tokenizer.named("image_id_end_token") : ""
            out += try prefix + imagePlaceholder(layout) + pieces[i + 1]
        }
        return out
    }

    /// The prompt for one user turn: images (in order), then text; an optional system message first.
    public func chat(_ text: String, images: [ImageLayout] = [], system: String? = nil) throws -> Prompt {
        let rendered = renderTemplate(text, imageCount: images.count, system: system)
        let expanded = try expandPlaceholders(rendered, images: images)
        return Prompt(text: expanded, ids: tokenizer.encode(expanded))
    }

    private func content(_ s: String) -> String {
        format.trimContent ? pyStrip(s) : s
    }
}
