import XCTest

@testable import MiniCPMVCore

/// The kit's text cases (tokenizer ids, stream pieces, flush) and prompt cases.
final class TextPromptTests: XCTestCase {
    func testEveryTextCase() throws {
        let kit = try Kit.load()
        let tok = try kit.tokenizer.get()
        let cases = try kit.index.objects("texts")
        XCTAssertGreaterThanOrEqual(cases.count, 5)
        for c in cases {
            let name = try c.string("name")
            let ids = try c.ints("ids")
            XCTAssertEqual(tok.encode(try c.string("text")), ids, "ids of text case \(name)")
            var decoder = StreamDecoder(tokenizer: tok)
            XCTAssertEqual(ids.map { decoder.push($0) }, try c.strings("pieces"), "pieces of text case \(name)")
            XCTAssertEqual(decoder.flush(), try c.string("flush"), "flush of text case \(name)")
            XCTAssertEqual(tok.decode(ids), try c.string("decoded"), "decode of text case \(name)")
        }
        print("[ios-core] texts: \(cases.count) cases")
    }

    func testStopIdsAndNamedTokens() throws {
        let kit = try Kit.load()
        let tok = try kit.tokenizer.get()
        XCTAssertEqual(tok.stopIds, try kit.index.ints("stop_ids"))
        XCTAssertEqual(try tok.id(named: "image_token"), try kit.model.imageTokenId)
        XCTAssertEqual(try tok.id(named: "video_token"), try kit.model.videoTokenId)
    }

    func testUtf8ReplacementLikePython() {
        // b"\xe4\xb8" + b"A" -> U+FFFD "A"; a lone continuation byte; a truncated tail flushes to U+FFFD
        XCTAssertEqual(Utf8StreamDecoder.decodeReplacing([0xE4, 0xB8, 0x41]), "\u{FFFD}A")
        XCTAssertEqual(Utf8StreamDecoder.decodeReplacing([0x80, 0x41]), "\u{FFFD}A")
        XCTAssertEqual(Utf8StreamDecoder.decodeReplacing([0xED, 0xA0, 0x80]), "\u{FFFD}\u{FFFD}\u{FFFD}")
        var d = Utf8StreamDecoder()
        XCTAssertEqual(d.decode([0xF0, 0x9F]), "")
        XCTAssertEqual(d.decode([0x98, 0x80]), "😀")
        XCTAssertEqual(d.decode([0xE4]), "")
        XCTAssertEqual(d.flush(), "\u{FFFD}")
    }

    func testEveryPromptCase() throws {
        let kit = try Kit.load()
        let tok = try kit.tokenizer.get()
        let template = try XCTUnwrap(try kit.asset("chat_template.jinja"), "the kit has no chat_template.jinja")
        let builder = try PromptBuilder(
            tokenizer: tok, chatTemplate: template, useImageId: try kit.sliceConfig.useImageId)
        let cases = try kit.index.objects("prompts")
        XCTAssertGreaterThanOrEqual(cases.count, 4)
        for c in cases {
            let name = try c.string("name")
            let layouts = try c.objects("images").map { img in
                let grid: [Int]? = img.has("grid") ? try img.ints("grid") : nil
                return ImageLayout(
                    sourceTokens: try img.int("source_tokens"), grid: grid, tileTokens: try img.ints("tile_tokens"))
            }
            let prompt = try builder.chat(try c.string("text"), images: layouts)
            XCTAssertEqual(prompt.text, try c.string("prompt_text"), "prompt_text of prompt case \(name)")
            XCTAssertEqual(prompt.ids, try c.ints("ids"), "ids of prompt case \(name)")
        }
        print("[ios-core] prompts: \(cases.count) cases")
    }

    func testPromptRefusesAStrangeTemplateAndStrayPlaceholders() throws {
        let kit = try Kit.load()
        let tok = try kit.tokenizer.get()
        XCTAssertThrowsError(try PromptBuilder(tokenizer: tok, chatTemplate: "{{ messages }}"))
        let template = try XCTUnwrap(try kit.asset("chat_template.jinja"))
        let builder = try PromptBuilder(tokenizer: tok, chatTemplate: template)
        XCTAssertThrowsError(try builder.chat("what is <|image_pad|>?", images: []))
        XCTAssertThrowsError(
            try builder.chat("q", images: [ImageLayout(sourceTokens: 4, grid: [1, 2], tileTokens: [4])]))
    }
}
